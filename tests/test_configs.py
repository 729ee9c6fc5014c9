"""Every config file builds, and the presets scale as documented."""

import importlib

import pytest

from configs import cifar_paper, hardware, imagenet_cutmix
from conftest import REPO
from results.configs import cifar10, cifar10_finetune, cifar10_gauss, cifar10_scratch
from results.configs import mnist_gauss, ptb, ptb_asgd
from trainer import image, language

# The user presets and RESULTS.md's experiments, as modules.
CONFIG_MODULES = sorted(".".join(p.relative_to(REPO).with_suffix("").parts)
                        for folder in ("configs", "results/configs")
                        for p in (REPO / folder).glob("*.py") if p.stem != "__init__")


def test_config_modules_are_found():
  assert {"configs.image_base", "configs.ptb_awd_lstm", "results.configs.ptb"} <= set(CONFIG_MODULES)


@pytest.mark.parametrize("name", CONFIG_MODULES)
def test_every_config_builds(name):
  # Every config names its task; the language ones their output layer's loss chunk.
  config = importlib.import_module(name).get_config()
  assert config.task in ("image", "language")
  assert ("vocab_chunk_size" in config) == (config.task == "language")


@pytest.mark.parametrize("dataset", cifar_paper.DATASETS)
@pytest.mark.parametrize("model", cifar_paper.MODELS)
@pytest.mark.parametrize("method", cifar_paper.METHODS)
def test_paper_cifar_configs_are_valid(dataset, model, method):
  config = cifar_paper.get_config(f"{dataset},{model},{method}")
  image.validate_config(config, num_devices=1)
  expected_m = 1 if method == "cutout" else (10 if model == "wrn28_10" else 4)
  assert config.maxup.num_copies == expected_m
  assert config.num_epochs == 200 and config.batch_size == 256
  assert config.augment.cutout_length == (16 if dataset == "cifar10" else 8)


def test_imagenet_config_is_the_paper_fine_tune():
  config = imagenet_cutmix.get_config("resnet101,maxup")
  assert (config.model, config.maxup.num_copies, config.learning_rate) == ("resnet101", 4, 1e-5)
  assert (config.batch_size, config.num_epochs, config.augment.cutmix_alpha) == (256, 20, 1.0)


@pytest.mark.parametrize("arg", ["cifar10,resnet99,maxup", "svhn,resnet110,maxup", "cifar10"])
def test_bad_paper_config_arguments(arg):
  with pytest.raises(ValueError, match="valid|expected"):
    cifar_paper.get_config(arg)


RESULTS_CONFIGS = [(cifar10, "1", ("2", "4", "10")), (mnist_gauss, "1", ("5",)),
                   (ptb, "1", ("2",)), (cifar10_scratch, "1", ("2", "4", "10")),
                   (cifar10_finetune, "cutout,1", ("cutout,4",)),
                   (cifar10_finetune, "cutmix,1", ("cutmix,4",)),
                   (cifar10_gauss, "1", ("5",)),
                   (ptb_asgd, "0.3,1", ("0.3,2",))]


@pytest.mark.parametrize("module, baseline, maxup_args", RESULTS_CONFIGS)
def test_results_configs_differ_only_in_the_number_of_copies(module, baseline, maxup_args):
  reference = module.get_config(baseline).to_dict()
  assert reference["maxup"]["num_copies"] == 1
  for arg in maxup_args:
    config = module.get_config(arg)
    if config.task == "image":
      image.validate_config(config, num_devices=1)
    as_dict = config.to_dict()
    assert as_dict["maxup"].pop("num_copies") == int(arg.split(",")[-1])
    assert as_dict == {**reference, "maxup": {k: v for k, v in reference["maxup"].items()
                                              if k != "num_copies"}}


@pytest.mark.parametrize("module, baseline", [(m, b) for m, b, _ in RESULTS_CONFIGS])
def test_results_configs_reject_other_copy_counts(module, baseline):
  prefix = baseline.rpartition(",")[0] + "," if "," in baseline else ""
  with pytest.raises(ValueError, match="M='3'; valid"):
    module.get_config(prefix + "3")


def test_ptb_asgd_sets_every_dropout_but_the_embeddings_and_rejects_bad_values():
  config = ptb_asgd.get_config("0.5,2")
  assert [config.model[name] for name in ("input_dropout", "hidden_dropout", "output_dropout",
                                          "weight_dropout")] == [0.5] * 4
  assert config.model.embed_dropout == 0.1 and config.finetune.num_restarts == 1
  language.validate_config(config, num_devices=1)
  for arg in ("1.0,1", "-0.1,1", "high,2", "2"):
    with pytest.raises(ValueError, match="DROPOUT=.*must be a number in \\[0, 1\\)"):
      ptb_asgd.get_config(arg)


def test_fine_tune_starts_from_the_scratch_baseline_and_rejects_other_augmentations():
  scratch = cifar10_scratch.get_config("1")
  for arg in ("cutout,4", "cutmix,1"):
    config = cifar10_finetune.get_config(arg)
    assert config.init_checkpoint.endswith("cifar10_scratch/m1_seed0")
    assert (config.model, config.num_train_examples) == (scratch.model, scratch.num_train_examples)
    assert config.learning_rate < scratch.learning_rate and config.maxup.warmup_epochs == 0
  assert cifar10_finetune.get_config("cutmix,4").augment.cutmix_alpha == 1.0
  assert cifar10_finetune.get_config("cutmix,4").augment.cutout_length == 0
  with pytest.raises(ValueError, match="AUG='mixup'.*valid"):
    cifar10_finetune.get_config("mixup,4")


def test_presets_scale_batch_and_learning_rate():
  base = cifar_paper.get_config("cifar10,wrn28_10,maxup")
  config = hardware.get_config("gpu8:cifar_paper:cifar10,wrn28_10,maxup")
  assert config.expected_device_count == 8 and config.batch_size == 1024
  assert config.learning_rate == pytest.approx(base.learning_rate * 4)
  assert config.lr_warmup_epochs == 5 and config.dtype == "bfloat16"
  assert config.maxup.num_copies == 10
  image.validate_config(config, num_devices=8)
  with pytest.raises(ValueError, match="expected_device_count=8 but the run has 4 devices"):
    image.validate_config(config, num_devices=4)
  pod = hardware.get_config("tpu_v4_32:imagenet_cutmix:resnet50,maxup")
  assert pod.batch_size == 1024 and pod.learning_rate == pytest.approx(4e-5)
  assert hardware.get_config("gpu1").lr_warmup_epochs == 0


def test_unknown_preset():
  with pytest.raises(ValueError, match="PRESET='a100'"):
    hardware.get_config("a100")
