"""Sample-quality evaluation.

    frechet.py           Frechet distance as the ADM evaluator computes it (any feature network)
    mnist_classifier.py  the small digit CNN whose features and labels score the MNIST demo
    mnist_eval.py        label accuracy + Frechet distance (with a real-data floor) of a sample .npz:
                         python -m ddt_jax.evaluation.mnist_eval SAMPLES.npz [--output metrics.json]

Modules are imported explicitly (`from ddt_jax.evaluation import frechet`) so that using the
Frechet distance alone does not import JAX.
"""
