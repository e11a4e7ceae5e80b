"""Training entry point for ``torchrun`` (see ``dist_spectral/training``).

    .venv/bin/torchrun --standalone --nproc_per_node=2 launch/train.py --config configs/runs/tiny-olmoe-fsdp.yaml
    .venv/bin/torchrun --standalone --nproc_per_node=2 launch/train.py train.steps=50 optim.recipe=muon
"""
import sys
from pathlib import Path

# torchrun puts launch/ (not the checkout) first on sys.path: import this checkout's package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dist_spectral.training import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
