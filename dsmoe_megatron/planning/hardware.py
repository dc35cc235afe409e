"""GPUs the planner knows, and the cluster a plan is made for.

Peak tensor-core throughput is the dense figure (NVIDIA datasheets print it "with sparsity",
twice the dense rate; the dense rate is used here). Memory is the datasheet capacity in GB
(1e9 bytes); the devices expose slightly more (an H100 80GB reports 81,559 MiB), which is left
as margin. Bandwidths are per GPU and per direction: NVLink is the datasheet's bidirectional
figure halved; the network is the node's InfiniBand NICs (one per GPU on the DGX/HGX systems
named) in bytes per second.

GPUs without NVLink between all GPUs of a node (L40S: none; H100 PCIe / NVL: a bridge joins
pairs only, while TP, EP and DP groups span up to the whole node) talk over PCIe inside the
node: their ``nvlink_bandwidth`` is the PCIe x16 link's (datasheet bidirectional figure halved),
and ``intra_node_link`` says so. Their servers have no DGX datasheet; the network is that of
NVIDIA's Enterprise Reference Architecture for 8-GPU PCIe servers (2-8-5-200: 200 Gb/s of
east-west network per GPU).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dsmoe_megatron.config import ConfigError

GB = 1e9
TFLOPS = 1e12


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_flops: float        # dense BF16 tensor-core peak, FLOP/s
    fp8_flops: float | None  # dense FP8 peak; None: no FP8 tensor cores
    memory: float            # bytes
    memory_bandwidth: float  # HBM, bytes/s
    nvlink_bandwidth: float  # per GPU, one direction, bytes/s
    network_bandwidth: float  # per GPU (its own NIC), one direction, bytes/s
    source: str
    intra_node_link: str = "NVLink"  # what nvlink_bandwidth is: NVLink, or PCIe without it

    @property
    def link(self) -> str:
        """The link inside a node in a word (NVLink, PCIe), as the plan's text names it."""
        return self.intra_node_link.split()[0]


GPUS = {gpu.name: gpu for gpu in (
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4 40GB): BF16 312 TFLOPS dense, no FP8, 40GB
    # HBM2 at 1,555 GB/s, NVLink 3 600 GB/s; DGX A100 (40GB) datasheet: 8x 200 Gb/s HDR.
    GPU("A100-40GB", 312 * TFLOPS, None, 40 * GB, 1555 * GB, 300 * GB, 25 * GB,
        "NVIDIA A100 datasheet (SXM4 40GB); DGX A100 datasheet (8x 200Gb/s HDR)"),
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): BF16 312 TFLOPS dense (624 sparse), no
    # FP8, 80GB HBM2e at 2,039 GB/s, NVLink 3 600 GB/s; DGX A100 datasheet: 8x ConnectX-6
    # 200 Gb/s HDR InfiniBand compute NICs (one per GPU).
    GPU("A100-80GB", 312 * TFLOPS, None, 80 * GB, 2039 * GB, 300 * GB, 25 * GB,
        "NVIDIA A100 datasheet (SXM4 80GB); DGX A100 datasheet (8x 200Gb/s HDR)"),
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 1,979 / FP8 3,958 TFLOPS with sparsity
    # (989 / 1,979 dense), 80GB HBM3 at 3.35 TB/s, NVLink 4 900 GB/s; DGX H100 datasheet:
    # 8x ConnectX-7 400 Gb/s NDR InfiniBand.
    GPU("H100-80GB", 989 * TFLOPS, 1979 * TFLOPS, 80 * GB, 3350 * GB, 450 * GB, 50 * GB,
        "NVIDIA H100 datasheet (SXM5); DGX H100 datasheet (8x 400Gb/s NDR)"),
    # NVIDIA H100 datasheet (H100 PCIe, 80GB): BF16 1,513 / FP8 3,026 TFLOPS with sparsity
    # (756.5 / 1,513 dense), 80GB HBM2e at 2 TB/s, PCIe Gen5 128 GB/s (the 600 GB/s NVLink
    # bridge joins pairs only: modelled as PCIe Gen5 x16, 64 GB/s per direction).
    GPU("H100-PCIe", 756.5 * TFLOPS, 1513 * TFLOPS, 80 * GB, 2000 * GB, 64 * GB, 25 * GB,
        "NVIDIA H100 datasheet (PCIe 80GB); Enterprise RA 2-8-5-200 (200Gb/s per GPU)",
        "PCIe Gen5 x16"),
    # NVIDIA H100 datasheet (H100 NVL, PCIe card): BF16 1,671 / FP8 3,341 TFLOPS with sparsity
    # (835.5 / 1,670.5 dense), 94GB HBM3 at 3.9 TB/s, PCIe Gen5 128 GB/s (NVLink bridge: pairs
    # only, modelled as PCIe Gen5 x16 as above).
    GPU("H100-NVL", 835.5 * TFLOPS, 1670.5 * TFLOPS, 94 * GB, 3900 * GB, 64 * GB, 25 * GB,
        "NVIDIA H100 datasheet (NVL 94GB); Enterprise RA 2-8-5-200 (200Gb/s per GPU)",
        "PCIe Gen5 x16"),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): the H100's compute (BF16 989 / FP8 1,979
    # TFLOPS dense), 141GB HBM3e at 4.8 TB/s, NVLink 900 GB/s; DGX H200: 8x ConnectX-7 400 Gb/s.
    GPU("H200-141GB", 989 * TFLOPS, 1979 * TFLOPS, 141 * GB, 4800 * GB, 450 * GB, 50 * GB,
        "NVIDIA H200 datasheet (SXM); DGX H200 datasheet (8x 400Gb/s NDR)"),
    # NVIDIA HGX B200 / DGX B200 datasheets: 8 GPUs with 72 PFLOPS FP8 and 36 PFLOPS BF16 with
    # sparsity (per GPU dense: FP8 4.5 PF, BF16 2.25 PF), 1,440GB HBM3e (180GB per GPU) at
    # 8 TB/s per GPU, NVLink 5 1.8 TB/s per GPU; DGX B200: 8x ConnectX-7 400 Gb/s.
    GPU("B200", 2250 * TFLOPS, 4500 * TFLOPS, 180 * GB, 8000 * GB, 900 * GB, 50 * GB,
        "NVIDIA DGX B200 / HGX B200 datasheets (8x 400Gb/s NDR)"),
    # NVIDIA L40S datasheet (PCIe card): BF16 362.05 / FP8 733 TFLOPS dense (733 / 1,466 with
    # sparsity), 48GB GDDR6 at 864 GB/s, no NVLink: PCIe Gen4 x16 64 GB/s, 32 per direction.
    GPU("L40S", 362.05 * TFLOPS, 733 * TFLOPS, 48 * GB, 864 * GB, 32 * GB, 25 * GB,
        "NVIDIA L40S datasheet (PCIe); Enterprise RA 2-8-5-200 (200Gb/s per GPU)", "PCIe Gen4 x16"),
)}


def get_gpu(name: str) -> GPU:
    upper = {known.upper(): gpu for known, gpu in GPUS.items()}
    if name.upper() in upper:
        return upper[name.upper()]
    # the same model ('h200', 'H100-SXM') only: a name a letter or a digit away from a known
    # one is often another card (the L40 has half the L40S's BF16 rate; B100, B200; A1000)
    near = [known for known in GPUS
            if re.match(re.escape(known.split("-")[0]) + "(?![0-9])", name.upper())]
    hint = f"; did you mean {' or '.join(near)}?" if near else ""
    raise ConfigError(f"--gpu {name!r} is not a GPU the planner knows (known: "
                      f"{', '.join(GPUS)}){hint}; for another GPU, add its datasheet figures "
                      "to GPUS in dsmoe_megatron/planning/hardware.py")


@dataclass(frozen=True)
class Cluster:
    gpu: GPU
    num_gpus: int
    gpus_per_node: int = 8

    def __post_init__(self):
        if self.num_gpus < 1 or self.gpus_per_node < 1:
            raise ConfigError(f"--gpus ({self.num_gpus}) and --gpus-per-node "
                              f"({self.gpus_per_node}) must be >= 1")
        if self.num_gpus > self.gpus_per_node and self.num_gpus % self.gpus_per_node:
            raise ConfigError(f"--gpus {self.num_gpus} is not a whole number of nodes of "
                              f"{self.gpus_per_node} GPUs; use a multiple of {self.gpus_per_node}")

    @property
    def num_nodes(self) -> int:
        return -(-self.num_gpus // self.gpus_per_node)
