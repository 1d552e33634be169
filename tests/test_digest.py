"""fp8norm.digest: XXH3-128 of a file as xxhash computes it on the whole bytes, and sha256 (what manifests of
an fp8norm before XXH3 record, still checked by unshard) as hashlib computes it; across chunk boundaries."""

import hashlib

import xxhash

from fp8norm import digest


def test_a_file_digest_is_the_whole_bytes_digest_of_either_kind(tmp_path):
    data = bytes(range(256)) * ((3 * (1 << 24)) // 256 + 7)  # three chunks and a tail
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert digest.of_file(path) == xxhash.xxh3_128_hexdigest(data)
    assert digest.of_file(path, "sha256") == hashlib.sha256(data).hexdigest()
