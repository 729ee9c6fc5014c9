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
interrupted certification from the last finished image. The flags other than
--workdir are the fields of `trainer.certification.CertifySettings`, which
checks them.
"""

from trainer.stack import require_training_stack

require_training_stack("certify.py")

import dataclasses

from absl import app, flags, logging

from trainer import certification, xla_cpu

# One flag per `certification.CertifySettings` field, with its default; `main` builds the
# settings from them by field name, so a field without a flag fails at once.
DEFAULTS = certification.CertifySettings()
WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory (train.py --workdir).")
flags.DEFINE_float(
    "sigma", DEFAULTS.sigma, "Smoothing noise level in [0, 1] pixel units; default the run's "
    "config.augment.gaussian_sigma.")
flags.DEFINE_integer("n0", DEFAULTS.n0, "Noise samples to select the top class.")
flags.DEFINE_integer("n", DEFAULTS.n, "Noise samples to estimate its probability.")
flags.DEFINE_float("alpha", DEFAULTS.alpha, "Failure probability of each certificate.")
flags.DEFINE_integer(
    "batch_size", DEFAULTS.batch_size, "Noise samples per forward pass, split over all devices.")
flags.DEFINE_integer(
    "skip", DEFAULTS.skip, "Certify every skip-th test image (Cohen et al.: 20 on CIFAR-10).")
flags.DEFINE_integer(
    "max_images", DEFAULTS.max_images, "Stop after this many images (default all).")
flags.DEFINE_string(
    "split", DEFAULTS.split, "Dataset split; default the run's evaluation split.")
flags.DEFINE_string(
    "data_dir", DEFAULTS.data_dir, "tfds data dir; default the run's data_dir, else "
    "$TFDS_DATA_DIR.")
flags.DEFINE_string("out_dir", DEFAULTS.out_dir, "Output directory; default WORKDIR/certify.")
flags.DEFINE_integer(
    "seed", DEFAULTS.seed, "Seed of the noise; image i uses fold_in(key(seed), i).")
flags.mark_flags_as_required(["workdir"])


def settings_from_flags() -> certification.CertifySettings:
  """The `CertifySettings` of the command line; a bad value stops with a usage error."""
  values = {field.name: flags.FLAGS[field.name].value
            for field in dataclasses.fields(certification.CertifySettings)}
  try:
    return certification.CertifySettings(**values)
  except ValueError as e:
    raise app.UsageError(str(e)) from e


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  settings = settings_from_flags()
  xla_cpu.apply_defaults()  # Before the first computation starts JAX's backend.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  run = certification.certify_workdir(WORKDIR.value, settings)
  print(f"log: {run.log_path}\ntable: {run.table_path}\nplot: {run.plot_path}", flush=True)


if __name__ == "__main__":
  app.run(main)
