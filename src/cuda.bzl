"""nvcc for Bazel 4, which has no CUDA rules: one genrule per .cu compiles position-independent
objects (sm_80 and sm_90 machine code) that a cc_library takes as srcs.

The genrules are tagged manual, so `bazel build //...` without --config=cuda never runs nvcc;
src/BUILD selects the objects only under --config=cuda (--define=use_cuda=true). The kernels
include no torch headers: Bazel has none, and the torch glue is built by torch's extension builder.
"""

NVCC = "/usr/local/cuda/bin/nvcc"

CUDA_ARCHS = ["80", "90"]

def _nvcc_command(src):
    gencode = " ".join(["-gencode=arch=compute_%s,code=sm_%s" % (a, a) for a in CUDA_ARCHS])
    # -I. is the execution root, so kernels include each other as "src/kernels/cuda/...".
    return "%s -c -std=c++17 -O3 -Xcompiler -fPIC %s -I. $(location %s) -o $@" % (NVCC, gencode, src)

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
