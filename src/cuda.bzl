"""nvcc for Bazel 4, which has no CUDA rules: one genrule per .cu compiles position-independent
objects (sm_80 and sm_90 machine code) that a cc_library takes as srcs.

The genrules are tagged manual, so `bazel build //...` without --config=cuda never runs nvcc;
src/BUILD selects the objects only under --config=cuda (--define=use_cuda=true). Nothing here
includes a torch header: the C ABI (src/bindings/c_api.h) takes raw pointers.
"""

NVCC = "/usr/local/cuda/bin/nvcc"

# sm_90a: Hopper's own instructions (wgmma, TMA) may be used; PTX of it for the driver's JIT too.
# Keep in step with gencode_flags in maga_transformer/ops/_compiled.py (the build from sources).
CUDA_ARCHS = ["80", "90a"]

def _nvcc_command(src):
    gencode = " ".join(["-gencode=arch=compute_%s,code=sm_%s" % (a, a) for a in CUDA_ARCHS])
    gencode += " -gencode=arch=compute_90a,code=compute_90a"
    # -I. is the execution root, so kernels include each other as "src/kernels/cuda/..."; -I$(GENDIR)
    # finds the generated src/source_hash.h.
    return ("%s -c -std=c++17 -O3 -Xcompiler -fPIC -DMAGA_CUDA_ARCHS=sm_80+sm_90a %s -I. -I$(GENDIR) " +
            "$(location %s) -o $@") % (NVCC, gencode, src)

def cuda_objects(name, srcs, hdrs):
    """Declares one manual genrule per .cu in srcs; returns the labels of their object files."""
    objects = []
    for src in srcs:
        stem = src[:-len(".cu")]
        native.genrule(
            name = "%s_%s" % (name, stem.replace("/", "_")),
            srcs = [src] + hdrs,
            outs = [stem + ".pic.o"],
            cmd = _nvcc_command(src),
            message = "nvcc %s" % src,
            tags = ["manual"],
        )
        objects.append(":" + stem + ".pic.o")
    return objects
