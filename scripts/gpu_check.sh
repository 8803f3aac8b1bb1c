#!/usr/bin/env bash
# The GPU checks of the project, in one run on a lent CUDA machine (its own python3 with torch + triton,
# not our .venv). Usage: scripts/gpu_check.sh [SECTION ...], sections: tests profile lora-op voice-step
# gate3d lora-serving (default: all, in that order). Results go to $OUT (or ./gpu-out). lora-serving reads
# POLICIES, LONG_SHARE and LONG_TOKENS (a share of long answers) and SERVING_TIMEOUT from the environment.
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
SECTIONS=${*:-tests profile lora-op voice-step gate3d lora-serving}
python3 -c "import torch,triton,transformers,peft;print(torch.__version__,triton.__version__,transformers.__version__,peft.__version__,torch.cuda.get_device_name())"
for s in $SECTIONS; do
  echo "== $s"
  case $s in
    tests) timeout 240 python3 -m pytest -q --noconftest -p no:cacheprovider -o addopts="" -m gpu \
             tests/test_atmm.py tests/test_vision_serving.py tests/test_step_graphs.py 2>&1 | tail -15 ;;
    profile) timeout 200 python3 -m vision.lora.profile --device cuda --quick --no-progress --json "$OUT/profile.json" 2>&1 | tail -25
             cp vision/lora/tile_configs/*.json "$OUT/" 2>/dev/null ;;
    lora-op) timeout 200 python3 -m bench lora-op --device cuda --json "$OUT/lora_op.json" --plot "$OUT/lora_op.png" 2>&1 | tail -25 ;;
    voice-step) timeout 150 python3 -m bench voice-step --device cuda --json "$OUT/voice_step.json" 2>&1 | tail -14 ;;
    gate3d) timeout 150 python3 -m bench gate3d --shape 7b --device cuda --repeats 5 --json "$OUT/gate3d_7b.json" \
              --plot "$OUT/gate3d_7b.png" 2>&1 | grep -v Warn | tail -14 ;;
    lora-serving) timeout "${SERVING_TIMEOUT:-330}" python3 -m bench lora-serving --device cuda --requests 160 --rates 16,4 \
                    --max-tokens 32 --max-running 64 --policies "${POLICIES:-auto,unmerged,merged,unmerged:eager}" \
                    --long-share "${LONG_SHARE:-0}" --long-tokens "${LONG_TOKENS:-256}" \
                    --json "$OUT/lora_serving.json" 2>&1 | grep -v Warn | tail -16 ;;
    *) echo "unknown section $s" ;;
  esac
done
