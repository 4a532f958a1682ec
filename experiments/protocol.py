"""The study's protocol, stated once: data split, network, batch, tasks, steps.

Everything else (the runner, the configs, the run ids, the report's text)
reads these names, so the protocol cannot say one thing in one place and
another elsewhere. Plain constants: importing this module loads no JAX.

``MODEL`` and ``SPLIT`` are hashed into every run id
(``experiments.study.run_config``): changing them orphans the committed runs
in ``results/*/runs.jsonl``.
"""
from __future__ import annotations

import math

# MNIST split (protocol.md): the first 5,000 of the 60k training images are the
# validation (closing) set on which importance is computed, as TensorFlow's old
# input_data did; the other 55,000 are the training set; 10,000 test images.
N_TRAIN, N_VALID, N_TEST = 55_000, 5_000, 10_000
SPLIT = f"valid=first{N_VALID // 1000}k"

# The seed's network: MLP with leaky ReLU (TensorFlow's default slope) on the
# hidden layers.
LAYERS = (784, 300, 150, 10)
LEAKY_SLOPE = 0.2
MODEL = "mlp-" + "-".join(map(str, LAYERS)) + f"-leaky{LEAKY_SLOPE:g}"

# Training: 10 tasks, each 4 epochs of SGD/Adam steps on batches of 100.
TASKS = 10
BATCH_SIZE = 100
EPOCHS_PER_TASK = 4
STEPS_PER_TASK = math.ceil(N_TRAIN * EPOCHS_PER_TASK / BATCH_SIZE)  # 2200

# Where the study's runs were made (their wall times in results/ are this machine's).
CPU_CORES = 2
MACHINE = f"{CPU_CORES}-core CPU"
