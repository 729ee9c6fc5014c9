"""The run records of trainer/metrics.py: the host a run's wall times come from."""

from trainer import metrics

EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx avx2 fma

processor\t: 1
model name\t: something else
"""


def test_cpu_name_adds_family_model_and_widest_vector_extension(tmp_path):
  path = tmp_path / "cpuinfo"
  path.write_text(EPYC)
  assert metrics.cpu_name(str(path)) == "AMD EPYC (family 25 model 1, AVX2)"
  path.write_text(EPYC.replace("avx2 fma", "avx2 avx512f avx512bw"))
  assert metrics.cpu_name(str(path)) == "AMD EPYC (family 25 model 1, AVX512)"


def test_cpu_name_without_x86_fields_is_the_model_name(tmp_path):
  path = tmp_path / "cpuinfo"
  path.write_text("processor\t: 0\nmodel name\t: Neoverse-V2\nFeatures\t: fp asimd sve\n")
  assert metrics.cpu_name(str(path)) == "Neoverse-V2"
  assert metrics.cpu_name(str(tmp_path / "missing"))  # Falls back to the platform module.


def test_host_record_is_json_ready(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path), enabled=True)
  writer.write(0, "host", metrics.host_record())
  writer.close()
  [record] = metrics.read_metrics(str(tmp_path))
  assert record["split"] == "host" and record["num_devices"] >= 1
  assert isinstance(record["cpu"], str) and isinstance(record["jax"], str)
