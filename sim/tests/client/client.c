/* A plain C driver-API client for lowbit-sim's libcuda.so: loads a PTX module given as a
 * string, launches y[off + i] = fmaf(x[i], a, b) for i < n (scalar parameters of 4 and 8 bytes
 * between pointer parameters), copies back and checks every element, then launches again with
 * the parameters passed through `extra`, and checks some of the driver's error paths.
 *
 * Uses only dlopen("libcuda.so") + dlsym, so it builds without CUDA headers:
 *   gcc -std=c11 -O1 -Wall -o client client.c -ldl
 *   LD_LIBRARY_PATH=<dir holding libcuda.so> ./client
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef unsigned int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void *CUcontext, *CUmodule, *CUfunction, *CUstream, *CUevent;

#define CU_LAUNCH_PARAM_END ((void *)0x00)
#define CU_LAUNCH_PARAM_BUFFER_POINTER ((void *)0x01)
#define CU_LAUNCH_PARAM_BUFFER_SIZE ((void *)0x02)
#define CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT 16
#define CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR 75
#define CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR 76
#define CU_STREAM_NON_BLOCKING 1
#define CUDA_ERROR_INVALID_VALUE 1
#define CUDA_ERROR_NOT_INITIALIZED 3
#define CUDA_ERROR_NOT_FOUND 500

static const char *PTX =
    "//\n"
    "// Written by hand in the style of the NVIDIA NVVM compiler (nvcc 13.0 -ptx)\n"
    "//\n"
    "\n"
    ".version 9.0\n"
    ".target sm_80\n"
    ".address_size 64\n"
    "\n"
    "\t// .globl\taffine\n"
    "\n"
    ".visible .entry affine(\n"
    "\t.param .u64 affine_param_0,\n"
    "\t.param .f32 affine_param_1,\n"
    "\t.param .u32 affine_param_2,\n"
    "\t.param .u64 affine_param_3,\n"
    "\t.param .f32 affine_param_4,\n"
    "\t.param .u64 affine_param_5\n"
    ")\n"
    ".maxntid 256, 1, 1\n"
    "{\n"
    "\t.reg .pred \t%p<2>;\n"
    "\t.reg .b32 \t%r<6>;\n"
    "\t.reg .f32 \t%f<5>;\n"
    "\t.reg .b64 \t%rd<12>;\n"
    "\n"
    "\n"
    "\tld.param.u64 \t%rd1, [affine_param_0];\n"
    "\tld.param.f32 \t%f1, [affine_param_1];\n"
    "\tld.param.u32 \t%r2, [affine_param_2];\n"
    "\tld.param.u64 \t%rd2, [affine_param_3];\n"
    "\tld.param.f32 \t%f2, [affine_param_4];\n"
    "\tld.param.u64 \t%rd3, [affine_param_5];\n"
    "\tmov.u32 \t%r3, %ctaid.x;\n"
    "\tmov.u32 \t%r4, %ntid.x;\n"
    "\tmov.u32 \t%r5, %tid.x;\n"
    "\tmad.lo.s32 \t%r1, %r3, %r4, %r5;\n"
    "\tsetp.ge.u32 \t%p1, %r1, %r2;\n"
    "\t@%p1 bra \t$L__BB0_2;\n"
    "\n"
    "\tcvta.to.global.u64 \t%rd4, %rd1;\n"
    "\tmul.wide.u32 \t%rd5, %r1, 4;\n"
    "\tadd.s64 \t%rd6, %rd4, %rd5;\n"
    "\tld.global.f32 \t%f3, [%rd6];\n"
    "\tfma.rn.f32 \t%f4, %f3, %f1, %f2;\n"
    "\tcvt.u64.u32 \t%rd7, %r1;\n"
    "\tadd.s64 \t%rd8, %rd3, %rd7;\n"
    "\tcvta.to.global.u64 \t%rd9, %rd2;\n"
    "\tshl.b64 \t%rd10, %rd8, 2;\n"
    "\tadd.s64 \t%rd11, %rd9, %rd10;\n"
    "\tst.global.f32 \t[%rd11], %f4;\n"
    "\n"
    "$L__BB0_2:\n"
    "\tret;\n"
    "\n"
    "}\n";

static void *lib;

static void *sym(const char *name) {
    void *p = dlsym(lib, name);
    if (!p) {
        fprintf(stderr, "FAIL: missing symbol %s\n", name);
        exit(1);
    }
    return p;
}

/* The driver entry points, resolved by name. */
#define FN(ret, name, args) static ret(*name) args
FN(CUresult, cuInit, (unsigned));
FN(CUresult, cuDeviceGetCount, (int *));
FN(CUresult, cuDeviceGet, (CUdevice *, int));
FN(CUresult, cuDeviceGetName, (char *, int, CUdevice));
FN(CUresult, cuDeviceGetAttribute, (int *, int, CUdevice));
FN(CUresult, cuDeviceTotalMem_v2, (size_t *, CUdevice));
FN(CUresult, cuDevicePrimaryCtxRetain, (CUcontext *, CUdevice));
FN(CUresult, cuDevicePrimaryCtxRelease_v2, (CUdevice));
FN(CUresult, cuCtxSetCurrent, (CUcontext));
FN(CUresult, cuCtxGetCurrent, (CUcontext *));
FN(CUresult, cuCtxSynchronize, (void));
FN(CUresult, cuStreamCreate, (CUstream *, unsigned));
FN(CUresult, cuStreamSynchronize, (CUstream));
FN(CUresult, cuStreamDestroy_v2, (CUstream));
FN(CUresult, cuStreamWaitEvent, (CUstream, CUevent, unsigned));
FN(CUresult, cuEventCreate, (CUevent *, unsigned));
FN(CUresult, cuEventRecord, (CUevent, CUstream));
FN(CUresult, cuEventSynchronize, (CUevent));
FN(CUresult, cuEventElapsedTime_v2, (float *, CUevent, CUevent));
FN(CUresult, cuEventDestroy_v2, (CUevent));
FN(CUresult, cuMemAlloc_v2, (CUdeviceptr *, size_t));
FN(CUresult, cuMemFree_v2, (CUdeviceptr));
FN(CUresult, cuMemsetD8Async, (CUdeviceptr, unsigned char, size_t, CUstream));
FN(CUresult, cuMemcpyHtoDAsync_v2, (CUdeviceptr, const void *, size_t, CUstream));
FN(CUresult, cuMemcpyDtoHAsync_v2, (void *, CUdeviceptr, size_t, CUstream));
FN(CUresult, cuMemcpyDtoDAsync_v2, (CUdeviceptr, CUdeviceptr, size_t, CUstream));
FN(CUresult, cuModuleLoadData, (CUmodule *, const void *));
FN(CUresult, cuModuleGetFunction, (CUfunction *, CUmodule, const char *));
FN(CUresult, cuModuleUnload, (CUmodule));
FN(CUresult, cuFuncSetAttribute, (CUfunction, int, int));
FN(CUresult, cuLaunchKernel, (CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                              CUstream, void **, void **));
FN(CUresult, cuGetErrorString, (CUresult, const char **));
FN(CUresult, cuGetErrorName, (CUresult, const char **));
#define LOAD(name) name = sym(#name)

static int failures;

static void check(CUresult r, const char *what, int line) {
    if (r != 0) {
        const char *name = "?", *desc = "?";
        cuGetErrorName(r, &name);
        cuGetErrorString(r, &desc);
        fprintf(stderr, "FAIL line %d: %s -> %u %s (%s)\n", line, what, r, name, desc);
        exit(1);
    }
}
#define CHECK(call) check((call), #call, __LINE__)

static void expect(CUresult got, CUresult want, const char *what, int line) {
    if (got != want) {
        fprintf(stderr, "FAIL line %d: %s -> %u, want %u\n", line, what, got, want);
        failures++;
    }
}
#define EXPECT(call, want) expect((call), (want), #call, __LINE__)

/* Kernel parameters laid out as the PTX .param list (offsets 0, 8, 12, 16, 24, 32). */
struct params {
    CUdeviceptr x;
    float a;
    unsigned n;
    CUdeviceptr y;
    float b;
    unsigned pad;
    unsigned long long off;
};

int main(void) {
    lib = dlopen("libcuda.so", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "FAIL: dlopen(libcuda.so): %s\n", dlerror());
        return 1;
    }
    LOAD(cuInit); LOAD(cuDeviceGetCount); LOAD(cuDeviceGet); LOAD(cuDeviceGetName);
    LOAD(cuDeviceGetAttribute); LOAD(cuDeviceTotalMem_v2); LOAD(cuDevicePrimaryCtxRetain);
    LOAD(cuDevicePrimaryCtxRelease_v2); LOAD(cuCtxSetCurrent); LOAD(cuCtxGetCurrent);
    LOAD(cuCtxSynchronize); LOAD(cuStreamCreate); LOAD(cuStreamSynchronize); LOAD(cuStreamDestroy_v2);
    LOAD(cuStreamWaitEvent); LOAD(cuEventCreate); LOAD(cuEventRecord); LOAD(cuEventSynchronize);
    LOAD(cuEventElapsedTime_v2); LOAD(cuEventDestroy_v2); LOAD(cuMemAlloc_v2); LOAD(cuMemFree_v2);
    LOAD(cuMemsetD8Async); LOAD(cuMemcpyHtoDAsync_v2); LOAD(cuMemcpyDtoHAsync_v2);
    LOAD(cuMemcpyDtoDAsync_v2); LOAD(cuModuleLoadData); LOAD(cuModuleGetFunction); LOAD(cuModuleUnload);
    LOAD(cuFuncSetAttribute); LOAD(cuLaunchKernel); LOAD(cuGetErrorString); LOAD(cuGetErrorName);

    int count = 0;
    EXPECT(cuDeviceGetCount(&count), CUDA_ERROR_NOT_INITIALIZED);
    CHECK(cuInit(0));
    CHECK(cuDeviceGetCount(&count));
    if (count != 1) {
        fprintf(stderr, "FAIL: %d devices\n", count);
        return 1;
    }
    CUdevice dev;
    CHECK(cuDeviceGet(&dev, 0));
    char name[128];
    CHECK(cuDeviceGetName(name, sizeof name, dev));
    if (!strstr(name, "lowbit-sim")) {
        fprintf(stderr, "FAIL: device name %s\n", name);
        failures++;
    }
    int sms = 0, major = 0, minor = 0;
    size_t total = 0;
    CHECK(cuDeviceGetAttribute(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev));
    CHECK(cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev));
    CHECK(cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev));
    CHECK(cuDeviceTotalMem_v2(&total, dev));

    CUcontext ctx, ctx2, cur;
    CHECK(cuDevicePrimaryCtxRetain(&ctx, dev));
    CHECK(cuDevicePrimaryCtxRetain(&ctx2, dev));
    if (ctx != ctx2) {
        fprintf(stderr, "FAIL: primary context handles differ\n");
        failures++;
    }
    CHECK(cuCtxSetCurrent(ctx));
    CHECK(cuCtxGetCurrent(&cur));
    if (cur != ctx) {
        fprintf(stderr, "FAIL: current context\n");
        failures++;
    }
    CUstream stream;
    CHECK(cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING));
    CUevent start, stop;
    CHECK(cuEventCreate(&start, 0));
    CHECK(cuEventCreate(&stop, 0));

    CUmodule mod;
    CHECK(cuModuleLoadData(&mod, PTX));
    CUfunction f, missing;
    CHECK(cuModuleGetFunction(&f, mod, "affine"));
    EXPECT(cuModuleGetFunction(&missing, mod, "no_such_kernel"), CUDA_ERROR_NOT_FOUND);

    enum { N = 1000, OFF = 5, YLEN = N + OFF + 8, BLOCK = 128 };
    float *x = malloc(N * sizeof(float)), *y = malloc(YLEN * sizeof(float));
    for (int i = 0; i < N; i++) x[i] = 0.5f * (float)i - 100.0f; /* exact in f32 */
    CUdeviceptr dx, dy;
    CHECK(cuMemAlloc_v2(&dx, N * sizeof(float)));
    CHECK(cuMemAlloc_v2(&dy, YLEN * sizeof(float)));
    CHECK(cuMemcpyHtoDAsync_v2(dx, x, N * sizeof(float), stream));
    CHECK(cuMemsetD8Async(dy, 0, YLEN * sizeof(float), stream));
    CHECK(cuStreamWaitEvent(stream, start, 0));

    /* Launch 1: kernelParams. One block more than needed exercises the bounds check. */
    CUdeviceptr x_arg = dx, y_arg = dy;
    float a = 2.0f, b = 0.25f;
    unsigned n = N;
    unsigned long long off = OFF;
    void *args[] = {&x_arg, &a, &n, &y_arg, &b, &off};
    unsigned grid = (N + BLOCK - 1) / BLOCK + 1;
    CHECK(cuEventRecord(start, stream));
    CHECK(cuLaunchKernel(f, grid, 1, 1, BLOCK, 1, 1, 0, stream, args, NULL));
    CHECK(cuEventRecord(stop, stream));
    CHECK(cuStreamSynchronize(stream));
    CHECK(cuEventSynchronize(stop));
    float ms = -1.0f;
    CHECK(cuEventElapsedTime_v2(&ms, start, stop));
    CHECK(cuMemcpyDtoHAsync_v2(y, dy, YLEN * sizeof(float), stream));
    int bad = 0;
    for (int j = 0; j < YLEN; j++) {
        float want = (j >= OFF && j < OFF + N) ? 2.0f * x[j - OFF] + 0.25f : 0.0f;
        if (y[j] != want) {
            if (bad < 5) fprintf(stderr, "FAIL: launch 1: y[%d] = %g, want %g\n", j, y[j], want);
            bad++;
        }
    }

    /* Launch 2: the same kernel with the parameter buffer passed through `extra`. */
    struct params p = {dx, -1.0f, N, dy, 3.0f, 0, OFF};
    size_t psize = sizeof p;
    void *extra[] = {CU_LAUNCH_PARAM_BUFFER_POINTER, &p, CU_LAUNCH_PARAM_BUFFER_SIZE, &psize, CU_LAUNCH_PARAM_END};
    CHECK(cuLaunchKernel(f, (N + 255) / 256, 1, 1, 256, 1, 1, 0, stream, NULL, extra));
    CHECK(cuCtxSynchronize());
    CHECK(cuMemcpyDtoHAsync_v2(y, dy, YLEN * sizeof(float), stream));
    for (int j = OFF; j < OFF + N; j++) {
        float want = -x[j - OFF] + 3.0f;
        if (y[j] != want) {
            if (bad < 5) fprintf(stderr, "FAIL: launch 2: y[%d] = %g, want %g\n", j, y[j], want);
            bad++;
        }
    }
    failures += bad != 0;

    /* A device-to-device copy of the result. */
    CUdeviceptr dz;
    CHECK(cuMemAlloc_v2(&dz, YLEN * sizeof(float)));
    CHECK(cuMemcpyDtoDAsync_v2(dz, dy, YLEN * sizeof(float), stream));
    float *z = malloc(YLEN * sizeof(float));
    CHECK(cuMemcpyDtoHAsync_v2(z, dz, YLEN * sizeof(float), stream));
    if (memcmp(y, z, YLEN * sizeof(float)) != 0) {
        fprintf(stderr, "FAIL: device-to-device copy\n");
        failures++;
    }

    /* Launches a real driver refuses: beyond .maxntid, and 64 KiB of shared memory without
     * opting in. */
    EXPECT(cuLaunchKernel(f, 1, 1, 1, 512, 1, 1, 0, stream, args, NULL), CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 65536, stream, args, NULL), CUDA_ERROR_INVALID_VALUE);
    CHECK(cuFuncSetAttribute(f, 8 /* MAX_DYNAMIC_SHARED_SIZE_BYTES */, 65536));
    CHECK(cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 65536, stream, args, NULL));
    CHECK(cuCtxSynchronize());

    CHECK(cuMemFree_v2(dx));
    CHECK(cuMemFree_v2(dy));
    CHECK(cuMemFree_v2(dz));
    CHECK(cuEventDestroy_v2(start));
    CHECK(cuEventDestroy_v2(stop));
    CHECK(cuModuleUnload(mod));
    CHECK(cuStreamDestroy_v2(stream));
    CHECK(cuDevicePrimaryCtxRelease_v2(dev));
    CHECK(cuDevicePrimaryCtxRelease_v2(dev));
    free(x);
    free(y);
    free(z);

    if (failures) {
        fprintf(stderr, "FAIL: %d check(s) failed\n", failures);
        return 1;
    }
    printf("PASS: %s (cc %d.%d, %d SMs, %zu MiB): affine over %d elements, %u blocks of %d, "
           "kernelParams and extra, %.3f ms\n",
           name, major, minor, sms, total >> 20, N, grid, BLOCK, ms);
    return 0;
}
