"""Launch settings shared by every kernel (and by tools/aot_compile.py, so it builds what runs)."""

# 16 warps keep a 128x128 fp32 tile at ~90 registers a thread with no spills on sm_90/sm_100
# (8 warps: ~185 registers; 4 warps: spills). See `python tools/aot_compile.py`.
NUM_WARPS = 16

# No FMA contraction: `x * inv` must round on its own, as it does in the torch twin.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}
