"""run_tpu.sh: syntax, shellcheck, and the commands --dry-run prints."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "run_tpu.sh")


def _run(*args):
  return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, cwd=ROOT,
                        timeout=60)


def test_bash_syntax():
  subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_shellcheck_clean():
  exe = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
  if not os.path.exists(exe):
    pytest.skip("shellcheck not installed (pip install -r requirements-test.txt)")
  result = subprocess.run([exe, SCRIPT], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def test_dry_run_prints_create_copy_install_launch():
  out = _run("--zone=us-central2-b", "--accelerator=v4-32", "--project=my-proj",
             "--bucket=gs://my-bucket", "--dry-run")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert lines[0].startswith("gcloud compute tpus tpu-vm create vidrd-v4-32 --zone=us-central2-b "
                             "--project=my-proj --accelerator-type=v4-32")
  assert any(l.startswith("git -C ") and " archive " in l for l in lines)
  scp = [l for l in lines if "tpu-vm scp" in l]
  ssh = [l for l in lines if "tpu-vm ssh" in l]
  assert len(scp) == 1 and "--worker=all" in scp[0]
  assert len(ssh) == 3 and all("--worker=all" in l for l in ssh)
  assert "jax\\[tpu\\]==0.10.2" in ssh[1] and "requirements.txt" in ssh[1]
  assert ("python3\\ -m\\ vidrd_jax.train\\ --config=configs/tpu_v4.py\\ "
          "--workdir=gs://my-bucket/runs/vidrd-v4-32") in ssh[2]


def test_dry_run_custom_command_spot_and_skips():
  out = _run("--zone=us-west4-a", "--accelerator=v5litepod-16", "--name=exp", "--spot",
             "--skip-install", "--background", "--dry-run", "--",
             "python", "-m", "vidrd_jax.train", "--config=configs/tpu_v5e.py",
             "--workdir=gs://b/r", "--config.num_steps=10")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert "--spot" in lines[0] and "v5litepod-16" in lines[0]
  assert not any("pip" in l for l in lines)
  assert "nohup\\ python3\\ -m\\ vidrd_jax.train\\ --config=configs/tpu_v5e.py" in lines[-1]
  assert "--config.num_steps=10" in lines[-1]


@pytest.mark.parametrize("args, message", [
    (["--dry-run", "--bucket=gs://b"], "--zone is required"),
    (["--zone=z", "--dry-run"], "--bucket is required"),
    (["--zone=z", "--bucket=my-bucket", "--dry-run"], "must start with gs://"),
    (["--zone=z", "--accelerator=tpu", "--bucket=gs://b", "--dry-run"], "does not look like"),
    (["--zone=z", "--frobnicate"], "unknown argument"),
])
def test_bad_flags(args, message):
  out = _run(*args)
  assert out.returncode == 2 and message in out.stderr
