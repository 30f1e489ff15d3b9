"""Benchmarks, run as `python -m bnfree_jax.bench` (__main__.py: the flags).

- train_step: the paper's Table 7, the trainer's own compiled step
- suite: Table 7 on a GPU with MFU, the PyTorch peer and the trainer end to end
- torch_peer: that peer, a standalone script needing torch and torchvision only
- input: the input pipeline's throughput (the one module that imports TensorFlow)
- cpu_flags: XLA:CPU flag settings, each in its own process
- common: recipes, machine and load records, output files
"""
