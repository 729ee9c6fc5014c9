"""Certifies a trained model's smoothed classifier on the test set (Cohen et al., 2019).

  python certify.py --workdir runs/gauss_s0.25_m5 --skip 20
  python certify.py --workdir runs/mnist_gauss --n 10000 --skip 100

Certifies every --skip-th test image with CERTIFY (n0 selection and n
estimation noise samples, failure probability alpha) using the run's newest
checkpoint and, by default, the noise level it was trained with. Writes, under
--out_dir (default WORKDIR/certify):

  certify_sigma{S}.tsv                idx label predict radius correct time (one row per image)
  certified_accuracy_sigma{S}.tsv     certified accuracy at the paper's radii
  certified_accuracy_sigma{S}.png     certified accuracy against radius

and prints the table. Running the same command again continues an
interrupted certification from the last finished image.
"""

from trainer.stack import require_training_stack

require_training_stack("certify.py")

from absl import app, flags, logging

from trainer import certification, xla_cpu

WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory (train.py --workdir).")
SIGMA = flags.DEFINE_float(
    "sigma", None, "Smoothing noise level in [0, 1] pixel units; default the run's "
    "config.augment.gaussian_sigma.")
N0 = flags.DEFINE_integer("n0", 100, "Noise samples to select the top class.")
N = flags.DEFINE_integer("n", 100_000, "Noise samples to estimate its probability.")
ALPHA = flags.DEFINE_float("alpha", 0.001, "Failure probability of each certificate.")
BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 1000, "Noise samples per forward pass, split over all devices.")
SKIP = flags.DEFINE_integer(
    "skip", 1, "Certify every skip-th test image (Cohen et al.: 20 on CIFAR-10).")
MAX_IMAGES = flags.DEFINE_integer("max_images", None, "Stop after this many images (default all).")
SPLIT = flags.DEFINE_string("split", None, "Dataset split; default the run's evaluation split.")
DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "tfds data dir; default the run's data_dir, else $TFDS_DATA_DIR.")
OUT_DIR = flags.DEFINE_string("out_dir", None, "Output directory; default WORKDIR/certify.")
SEED = flags.DEFINE_integer("seed", 0, "Seed of the noise; image i uses fold_in(key(seed), i).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  xla_cpu.apply_defaults()  # Before the first computation starts JAX's backend.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  run = certification.certify_workdir(
      WORKDIR.value, sigma=SIGMA.value, n0=N0.value, n=N.value, alpha=ALPHA.value,
      batch_size=BATCH_SIZE.value, skip=SKIP.value, max_images=MAX_IMAGES.value,
      split=SPLIT.value, data_dir=DATA_DIR.value, out_dir=OUT_DIR.value, seed=SEED.value)
  print(f"log: {run.log_path}\ntable: {run.table_path}\nplot: {run.plot_path}", flush=True)


if __name__ == "__main__":
  app.run(main)
