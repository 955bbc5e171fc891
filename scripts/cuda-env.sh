# Sourced (not run): nvcc and the CUDA headers from PyPI wheels in a venv under target/, on
# PATH with CUDA_ROOT and CUDA_COMPUTE_CAP set, so `--features cuda` builds on a machine with no
# CUDA toolkit and no driver (cudarc loads libcuda at run time). CUDA 13's nvcc wheel is the
# one that ships the nvcc driver (the cu12 wheels hold ptxas only); 13.0 is a version cudarc
# 0.19 knows and matches the lent H200's driver.
cuda_venv=${CUDA_VENV:-target/cuda-venv}
[ -x "$cuda_venv/bin/python" ] || python3 -m venv "$cuda_venv"
"$cuda_venv/bin/python" -m pip install -q --disable-pip-version-check \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
  nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85
cuda_home=$(echo "$PWD/$cuda_venv"/lib/python3*/site-packages/nvidia/cu13)
export PATH="$cuda_home/bin:$PATH" CUDA_ROOT="$cuda_home" CUDA_PATH="$cuda_home" CUDA_HOME="$cuda_home"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} # sm_90: H100/H200
