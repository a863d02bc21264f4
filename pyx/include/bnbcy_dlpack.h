/* Minimal DLPack ABI declarations (https://dmlc.github.io/dlpack/latest/c_api.html).
 * Only the fields bnbcy reads are named; the layouts are those of the DLPack v0.8
 * (legacy "dltensor" capsule) and v1.x ("dltensor_versioned" capsule) ABIs. */
#ifndef BNBCY_DLPACK_H
#define BNBCY_DLPACK_H
#include <stdint.h>

typedef struct { int32_t device_type; int32_t device_id; } BnbcyDLDevice;
typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } BnbcyDLDataType;

typedef struct {
    void *data;
    BnbcyDLDevice device;
    int32_t ndim;
    BnbcyDLDataType dtype;
    int64_t *shape;
    int64_t *strides; /* NULL means compact row-major */
    uint64_t byte_offset;
} BnbcyDLTensor;

typedef struct BnbcyDLManagedTensor {
    BnbcyDLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct BnbcyDLManagedTensor *self);
} BnbcyDLManagedTensor;

typedef struct { uint32_t major; uint32_t minor; } BnbcyDLPackVersion;

typedef struct BnbcyDLManagedTensorVersioned {
    BnbcyDLPackVersion version;
    void *manager_ctx;
    void (*deleter)(struct BnbcyDLManagedTensorVersioned *self);
    uint64_t flags;
    BnbcyDLTensor dl_tensor;
} BnbcyDLManagedTensorVersioned;

#define BNBCY_DLPACK_FLAG_READ_ONLY 1ULL

/* DLDeviceType values bnbcy understands. */
#define BNBCY_DL_CPU 1
#define BNBCY_DL_CUDA 2
#define BNBCY_DL_CUDA_HOST 3
#define BNBCY_DL_CUDA_MANAGED 13

/* DLDataTypeCode values. */
#define BNBCY_DL_INT 0
#define BNBCY_DL_UINT 1
#define BNBCY_DL_FLOAT 2
#define BNBCY_DL_BFLOAT 4
#define BNBCY_DL_COMPLEX 5
#define BNBCY_DL_BOOL 6

#endif
