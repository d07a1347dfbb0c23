# Sourced by the scripts/gpu_*.sh windows after they set OUT and LOG: the environment every GPU run needs, the
# wheels the lent machine's image lacks (hydra-core, omegaconf, antlr4, torchdeq: copy ../shared/wheels/*.whl
# to .whl/ and name .whl in the run's carry) installed outside the image, and the device written at the top of LOG.
export PYTHONUNBUFFERED=1 WANDB_MODE=offline PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch; print('torch', torch.__version__)"; } 2>&1 | tee "$LOG"
