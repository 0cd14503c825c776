"""``python -m visionlora`` with accelerate put into FSDP version 2 on CPU processes (gloo).

accelerate turns FSDP on for GPU processes only; torch's FSDP2 itself runs on CPU. This
launcher (run under torchrun by the tests) sets the FSDP state an ``accelerate launch
--use_fsdp --fsdp_version 2`` would on GPUs, so the recipes' FSDP path runs here unchanged.
The plugin is put in after the Accelerator is made, so accelerate's FSDP mixed-precision set-up
and grad scaler are not exercised here (CPU runs are fp32 anyway).
Environment: VISIONLORA_TEST_FSDP_WRAP names the block class to wrap (transformer-based
policy), or ``size:<min_num_params>`` for the size-based policy.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    import visionlora.train.loop as loop

    made = loop.make_accelerator
    wrap = os.environ.get("VISIONLORA_TEST_FSDP_WRAP", "Block")

    def make_fsdp_accelerator(train, out_dir):  # type: ignore[no-untyped-def]
        accelerator = made(train, out_dir)
        if wrap.startswith("size:"):
            policy = {"auto_wrap_policy": "size_based_wrap", "min_num_params": int(wrap[5:])}
        else:
            policy = {"auto_wrap_policy": "transformer_based_wrap", "transformer_cls_names_to_wrap": [wrap]}
        state = AcceleratorState()
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2, **policy)
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate's own set-up does
        assert accelerator.distributed_type == DistributedType.FSDP
        return accelerator

    loop.make_accelerator = make_fsdp_accelerator
    from visionlora.cli import main as cli

    sys.exit(cli(sys.argv[1:]))


if __name__ == "__main__":
    main()
