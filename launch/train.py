"""Training entry point for ``torchrun`` and the ``deepspeed`` launcher (see ``dist_spectral/training``).

    .venv/bin/torchrun --standalone --nproc_per_node=2 launch/train.py      # the built-in default, tiny-olmoe-fsdp
    .venv/bin/torchrun --standalone --nproc_per_node=2 launch/train.py train.steps=50 optim.recipe=muon
    .venv/bin/deepspeed --num_gpus 2 launch/train.py --config configs/runs/tiny-olmoe-zero2.yaml

The ``deepspeed`` launcher passes ``--local_rank=N`` (it also sets ``LOCAL_RANK``, which is what
is read; ``main`` drops the flag); on a CPU-only machine it starts N local gloo processes without ssh.
"""
import sys
from pathlib import Path

# torchrun puts launch/ (not the checkout) first on sys.path: import this checkout's package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dist_spectral.training import main  # noqa: E402


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
