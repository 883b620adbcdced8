"""Sample-quality evaluation and the pictures a run shows.

    frechet.py           Frechet distance as the ADM evaluator computes it (any feature network)
    images.py            the uint8 conversion every sample takes, and image grids
    grids.py             the EMA sample grids of a training run
    mnist_classifier.py  the small digit CNN whose features and labels score the MNIST demo
    mnist_eval.py        label accuracy + Frechet distance (with a real-data floor) of a sample .npz

Modules are imported explicitly (`from ddt_jax.evaluation import frechet`) so that using the
Frechet distance alone does not import JAX.
"""
