"""The seed author's TF1 WVA model, re-typed to run under TF2's ``tf.compat.v1``.

    flock /tmp/wva-heavy.lock /work/tfvenv/bin/python benchmarks/seed_author/tf_wva.py \
        --importance fisher --lam 36050 --seeds 0 1 2 3 4 \
        --out results/seed_author/tf_runs.jsonl --tag author-tf

TensorFlow is not a project dependency: run it from a separate venv
(``python -m venv /work/tfvenv && /work/tfvenv/bin/pip install tensorflow-cpu``;
measured with tensorflow-cpu 2.21.0). Not part of the test suite.

Source: https://github.com/aakutalev/wva-empirical at commit
f8e5dae0d3266f89f7730a62681405d4a08c0609, files ``model_wvaFIS_sgd_1x_grads.py``
(sampled Fisher), ``model_wva_sgd_1x_grads.py`` (SIG), ``model_wvaMAS_sgd_1x_grads.py``
(MAS), ``model_wva_sgd_1x_deltas.py`` (increments), ``model_wva_sgd_exp_grads.py``
(exponential) and ``model_wva_adam_1x_deltas.py`` (Adam): their ``Model`` class,
``train_model`` and ``continual_learning``. Only the lines that compute
something are re-typed (the files are not vendored); the graph, the importance
formulas, the attenuation and the training loop are the author's, line for line.

Edits, each for TF2 ``compat.v1`` or for our data:

1. ``import tensorflow.compat.v1 as tf`` + ``tf.disable_v2_behavior()`` instead of
   TF 1.15's ``import tensorflow as tf``.
2. ``tensorflow.examples.tutorials.mnist.input_data`` no longer exists: MNIST
   comes from ``experiments.data.load_mnist`` (the project's verified copy,
   the same 55k/5k/10k split as ``input_data``: validation = the first 5,000
   training images; pixels k/255), labels one-hot with ``np.eye(10)``. The 10
   tasks use the project's permutations (``experiments.tasks.permutation``,
   data seed 0: task 1 unpermuted) instead of the author's ``permute_mnist``
   draws cached in his ``datasets.dmp``; applied as his ``permute_mnist``
   does (column i of a task = column perm[i] of MNIST).
3. ``DataSet.next_batch`` (from ``input_data``) re-typed as ``_Batches``: a
   fresh ``np.random`` shuffle at the start of every epoch (55,000 is a
   multiple of 100, so batches never straddle epochs).
4. The author's runs are unseeded and reuse one ``Model`` (``reset()``
   between runs). Here each run builds a fresh graph and session, with
   ``np.random.seed(seed)`` and ``tf.set_random_seed(seed)``. For SGD this is
   the same; for Adam it resets Adam's slots between runs, which the author's
   ``reset()`` did not (his runs after the first started with the previous
   run's Adam moments and bias-correction powers).
5. ``_WVA_SGD.minimize`` / ``_WVA_Adam.minimize`` (a subclass that multiplies each
   gradient by its attenuator between ``compute_gradients`` and
   ``apply_gradients``) are inlined as those three calls.
6. ``InteractiveSession``/``.eval()``/``.run()`` without a session argument
   become an explicit ``tf.Session``; ``Variable.load`` gets the session.

Swaps (issue 13, to find what separates this code from ours), all off by default;
none was run in issue 13's session (the curves already met, and CPU time ran out):

* ``--init ours``: initial weights from our runner's ``init_mlp`` for the seed,
* ``--batches ours``: our runner's batch order for the seed,
  (both read from ``--ours-npz``, written by ``export_ours.py``),
* ``--sig-bias pre``: SIG of a bias from the pre-activation ``z``, as
  ``wva_jax.importance.sig``, instead of the author's post-activation output.

Each run appends one JSON line to ``--out``: the curve (mean test accuracy
over the tasks seen so far, after each task), the full accuracy matrix, the
configuration and the wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from experiments import data as D  # noqa: E402  (numpy only)
from experiments import tasks as T  # noqa: E402
from experiments.results import ResultStore, light_provenance, with_provenance  # noqa: E402  (stdlib only)

AUTHOR_COMMIT = "f8e5dae0d3266f89f7730a62681405d4a08c0609"


def _weight_variable(tf, shape):
  # the author's init: truncated normal, stddev 2/sqrt(fan_in)
  stddev = 2. / np.sqrt(shape[0])
  initial = tf.random.truncated_normal(shape=shape, mean=0.0, stddev=stddev)
  return tf.Variable(initial, dtype=tf.float32)


def _bias_variable(tf, shape):
  initial = tf.constant(0.0, shape=shape)
  return tf.Variable(initial, dtype=tf.float32)


class Model:
  """The author's ``Model``; ``importance`` picks his Fisher, SIG or MAS script."""

  def __init__(self, tf, shape, session, learning_rate, impact_to_grads, importance,
               optimizer="sgd", viscosity="1x", sig_bias="post"):
    self.tf, self.session, self.importance = tf, session, importance
    self.viscosity = viscosity
    depth = len(shape) - 1
    self.x = tf.placeholder(tf.float32, shape=[None, shape[0]])
    self.labels = tf.placeholder(tf.float32, shape=[None, shape[-1]])
    self.var_list, self.vars_shadow, self.impacts = [], [], []
    for ins, outs in zip(shape[:-1], shape[1:]):
      self.var_list.append(_weight_variable(tf, [ins, outs]))
      self.var_list.append(_bias_variable(tf, [outs]))
      self.vars_shadow.append(_bias_variable(tf, [ins, outs]))
      self.vars_shadow.append(_bias_variable(tf, [outs]))
      self.impacts.append(_bias_variable(tf, [ins, outs]))
      self.impacts.append(_bias_variable(tf, [outs]))
    self.wb_importance = [np.zeros(v.shape, dtype=np.float32) for v in self.var_list]

    outputs, pre = [], []
    x, y, z = self.x, None, None
    for i in range(depth):
      z = tf.matmul(x, self.var_list[i * 2]) + self.var_list[i * 2 + 1]
      y = tf.nn.softmax(z) if i == depth - 1 else tf.nn.leaky_relu(z)
      outputs.append(y)
      pre.append(z)
      x = y

    # SIG (model_wva_*.py): |w_ij| * mean|input_i|; bias: mean|output_j| (after the
    # activation; softmax on the last layer). --sig-bias pre: mean|z_j| instead.
    self.signals = []
    os_ = tf.reduce_mean(tf.abs(self.x), axis=0)
    for i in range(depth):
      ws = tf.transpose(tf.multiply(os_, tf.transpose(tf.abs(self.var_list[i * 2]))))
      self.signals.append(ws)
      os_ = tf.reduce_mean(tf.abs(outputs[i]), axis=0)
      self.signals.append(os_ if sig_bias == "post" else tf.reduce_mean(tf.abs(pre[i]), axis=0))

    self.loss = tf.reduce_mean(
        tf.nn.softmax_cross_entropy_with_logits_v2(logits=z, labels=self.labels))
    self.correct_preds = tf.equal(tf.argmax(z, axis=1), tf.argmax(self.labels, axis=1))
    self.accuracy = tf.reduce_mean(tf.cast(self.correct_preds, tf.float32))

    self._store_shadow = [tf.assign(s, v) for v, s in zip(self.var_list, self.vars_shadow)]
    self._correct_vars = [tf.assign(v, s + i * (v - s))
                          for v, s, i in zip(self.var_list, self.vars_shadow, self.impacts)]
    self._impact_to_grads = impact_to_grads
    opt = (tf.train.GradientDescentOptimizer(learning_rate) if optimizer == "sgd"
           else tf.train.AdamOptimizer(learning_rate))
    if impact_to_grads:  # _WVA_SGD / _WVA_Adam .minimize(loss, impacts=self.impacts)
      impact = iter(self.impacts)  # shadows and impacts are trainable too: g is None
      gv = [(g, v) if g is None else (tf.multiply(g, next(impact)), v)
            for g, v in opt.compute_gradients(self.loss)]
      self._train_step = opt.apply_gradients(gv)
    else:
      self._train_step = opt.minimize(self.loss)

    # Fisher (model_wvaFIS_*.py): one class sampled from the softmax per example.
    class_ind = tf.cast(tf.random.categorical(tf.math.log(y), 1)[0][0], tf.int32)
    self.prob_grads = tf.gradients(tf.math.log(y[0, class_ind]), self.var_list)
    # MAS (model_wvaMAS_*.py): |d/dtheta mean_b sum_k softmax_k^2|, one batch.
    F = tf.reduce_mean(tf.reduce_sum(tf.square(y), axis=1))
    self.cur_importances = [tf.abs(grad) for grad in tf.gradients(F, self.var_list)]
    session.run(tf.global_variables_initializer())
    self.reset()

  def set_params(self, params):
    for v, p in zip(self.var_list, params):
      v.load(np.asarray(p, np.float32), self.session)
    for v, s in zip(self.var_list, self.vars_shadow):
      self.session.run(self.tf.assign(s, v))

  def params(self):
    return self.session.run(self.var_list)

  def _compute_fisher(self, closing_set):
    num_samples = len(closing_set)
    fisher = [np.zeros(v.shape, dtype=np.float32) for v in self.var_list]
    for i in range(num_samples):
      derivatives = self.session.run(self.prob_grads, feed_dict={self.x: closing_set[i:i + 1]})
      for f, d in zip(fisher, derivatives):
        f += np.square(d)
    for f in fisher:
      f /= num_samples
    return fisher

  def reset(self):
    for i in self.wb_importance:
      i.fill(0.)
    for v, s in zip(self.var_list, self.vars_shadow):
      self.session.run(self.tf.assign(s, v))

  def open_lesson(self, lmbda=0.0):
    for impact, imp in zip(self.impacts, self.wb_importance):
      a = 1. / (1. + lmbda * imp) if self.viscosity == "1x" else np.exp(-lmbda * imp)
      impact.load(a, self.session)

  def train_step(self, train_batch):
    if not self._impact_to_grads:
      self.session.run(self._store_shadow)
    self.session.run(self._train_step, feed_dict={self.x: train_batch[0],
                                                  self.labels: train_batch[1]})
    if not self._impact_to_grads:
      self.session.run(self._correct_vars)

  def task_importance(self, closing_set):
    if self.importance == "fisher":
      return self._compute_fisher(closing_set)
    what = self.signals if self.importance == "sig" else self.cur_importances
    return self.session.run(what, feed_dict={self.x: closing_set})

  def close_lesson(self, closing_set):
    for i, a in zip(self.wb_importance, self.task_importance(closing_set)):
      i += a


class _Batches:
  """``input_data``'s ``DataSet.next_batch``: a new shuffle every epoch (edit 3)."""

  def __init__(self, x, y, order=None):
    self.x, self.y, self.order, self.step = x, y, order, 0
    self.perm, self.pos = None, len(x)

  def next_batch(self, batch_size):
    if self.order is not None:  # --batches ours: our runner's indices
      idx = self.order[self.step]
    else:
      if self.pos + batch_size > len(self.x):
        self.perm = np.arange(len(self.x))
        np.random.shuffle(self.perm)
        self.pos = 0
      idx = self.perm[self.pos:self.pos + batch_size]
      self.pos += batch_size
    self.step += 1
    return self.x[idx], self.y[idx]


def make_tasks(num_tasks, data_seed=0):
  split = D.load_mnist(verbose=False)
  eye = np.eye(10, dtype=np.float32)
  out = []
  for t in range(num_tasks):
    perm = T.permutation(t, data_seed)
    out.append({"train": (split.x_train[:, perm], eye[split.y_train]),
                "validation": split.x_valid[:, perm],
                "test": (split.x_test[:, perm], eye[split.y_test])})
  return out, split.source


def continual_learning(model, tasks, lmbda, steps, orders=None, batch_size=100, log=None):
  """The author's ``continual_learning`` + ``train_model``; returns the accuracy matrix."""
  R = np.full((len(tasks), len(tasks)), np.nan)
  for t, task in enumerate(tasks):
    model.open_lesson(lmbda)
    batches = _Batches(*task["train"], None if orders is None else orders[t])
    for _ in range(steps):
      model.train_step(batches.next_batch(batch_size))
    for j in range(t + 1):
      xs, ys = tasks[j]["test"]
      R[t, j] = model.session.run(model.accuracy, feed_dict={model.x: xs, model.labels: ys})
    if log:
      log(f"task {t + 1}: mean acc {np.mean(R[t, :t + 1]):.4f}")
    model.close_lesson(task["validation"])
  return R


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--importance", choices=["fisher", "sig", "mas"], required=True)
  p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
  p.add_argument("--placement", choices=["grads", "deltas"], default="grads")
  p.add_argument("--viscosity", choices=["1x", "exp"], default="1x")
  p.add_argument("--lam", type=float, required=True)
  p.add_argument("--lr", type=float, help="default: 0.2 (SGD), 0.001 (Adam), as the author")
  p.add_argument("--seeds", type=int, nargs="+", default=[0])
  p.add_argument("--tasks", type=int, default=10)
  p.add_argument("--steps-per-task", type=int, default=2200)
  p.add_argument("--data-seed", type=int, default=0,
                 help="permutation draw (experiments.tasks.permutation); 0: the study's")
  p.add_argument("--init", choices=["author", "ours"], default="author")
  p.add_argument("--batches", choices=["author", "ours"], default="author")
  p.add_argument("--sig-bias", choices=["post", "pre"], default="post")
  p.add_argument("--ours-npz", default="data_cache/ours_seed{seed}.npz",
                 help="export_ours.py's file per seed (for --init/--batches ours)")
  p.add_argument("--tag", default="author-tf")
  p.add_argument("--out", required=True, help="jsonl file the runs are appended to")
  args = p.parse_args(argv)

  import tensorflow.compat.v1 as tf  # edit 1
  tf.disable_v2_behavior()
  lr = args.lr or (0.2 if args.optimizer == "sgd" else 0.001)
  tasks, source = make_tasks(args.tasks, args.data_seed)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  config = {k: getattr(args, k) for k in ("importance", "optimizer", "placement", "viscosity",
                                          "tasks", "steps_per_task", "init", "batches",
                                          "sig_bias")}
  if args.data_seed:  # keyed only when set, so the draw-0 runs keep their keys
    config["data_seed"] = args.data_seed
  config["lr"] = lr
  store = ResultStore(out)
  done = {(r["tag"], json.dumps(r["config"], sort_keys=True), r["seed"], r["lambda"]) for r in store.records()}
  prov = light_provenance("numpy", "tensorflow", "tensorflow-cpu")   # this venv has no JAX
  for seed in args.seeds:
    key = (args.tag, json.dumps(config, sort_keys=True), seed, args.lam)
    if key in done:
      print(f"seed {seed}: done already", flush=True)
      continue
    ours = None
    if args.init == "ours" or args.batches == "ours":
      ours = np.load(args.ours_npz.format(seed=seed))
    t0 = time.perf_counter()
    np.random.seed(seed)
    graph = tf.Graph()
    with graph.as_default():
      tf.set_random_seed(seed)
      with tf.Session(graph=graph, config=tf.ConfigProto(
          intra_op_parallelism_threads=2, inter_op_parallelism_threads=1)) as sess:
        model = Model(tf, [784, 300, 150, 10], sess, lr, args.placement == "grads",
                      args.importance, args.optimizer, args.viscosity, args.sig_bias)
        if args.init == "ours":
          model.set_params([ours[f"p{i}"] for i in range(6)])
        orders = ours["orders"] if args.batches == "ours" else None
        R = continual_learning(model, tasks, args.lam, args.steps_per_task, orders,
                               log=lambda s: print(f"seed {seed} {s}", flush=True))
    curve = [float(np.mean(R[t, :t + 1])) for t in range(args.tasks)]
    rec = {"tag": args.tag, "side": "author code (TF compat.v1)", "config": config,
           "seed": seed, "lambda": args.lam, "curve": curve,
           "R": [[None if np.isnan(v) else float(v) for v in row] for row in R],
           "wall_s": time.perf_counter() - t0, "tf_version": tf.__version__,
           "author_commit": AUTHOR_COMMIT, "data_source": source}
    store.append(with_provenance(rec, prov))
    print(f"seed {seed}: final {curve[-1]:.4f} ({rec['wall_s']:.0f} s)", flush=True)


if __name__ == "__main__":
  main()
