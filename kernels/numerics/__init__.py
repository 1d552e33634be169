"""The numeric rules the Triton kernels and their torch twins share, one module per format, at the
bottom of the package: they import torch and each other, nothing above them (no Triton, no fp8norm).

    fp8_block    block FP8 (DeepSeek/DeepGEMM): scales, ue8m0 / bf16 rounding, e4m3 saturation
    fp8_channel  FP8 with one scale per row (compressed-tensors FP8_DYNAMIC)
    mx           OCP MX (MXFP8, MXFP4): E8M0 scale per 32 elements
    nvfp4        NVFP4 (ModelOpt): E2M1 elements, e4m3 scale per 16, fp32 scale_2
    int4         int4 weight-only W4A16 (compressed-tensors pack-quantized): symmetric, scale per 128
    e2m1         E2M1 (FP4) elements, shared by MXFP4 and NVFP4
    args         argument checks of the public kernel / twin calls
"""
