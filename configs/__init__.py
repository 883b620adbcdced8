"""Training configs: `python train.py --config=configs/xl_256.py --workdir=DIR` (see xl_256.py)."""
