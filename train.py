"""Entry point: `python train.py [overrides]` (see README)."""

from fusionbench.train import main

if __name__ == "__main__":
    main()
