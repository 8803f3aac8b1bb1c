#!/usr/bin/env bash
# The GPU checks of the project, in one run on a lent CUDA machine (its own python3 with torch + triton,
# not our .venv): kernel tests, tile profiling, and the GPU benchmarks. Results go to $OUT (or ./gpu-out).
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
python3 -c "import torch,triton,transformers,peft;print(torch.__version__,triton.__version__,transformers.__version__,peft.__version__,torch.cuda.get_device_name())"
echo "== gpu tests"
timeout 240 python3 -m pytest -q --noconftest -p no:cacheprovider -o addopts="" -m gpu tests/test_atmm.py tests/test_vision_serving.py 2>&1 | tail -15
echo "== tile profile"
timeout 200 python3 -m vision.lora.profile --device cuda --quick --no-progress --json "$OUT/profile.json" 2>&1 | tail -25
cp vision/lora/tile_configs/*.json "$OUT/" 2>/dev/null
echo "== bench lora-op"
timeout 200 python3 -m bench lora-op --device cuda --json "$OUT/lora_op.json" --plot "$OUT/lora_op.png" 2>&1 | tail -25
echo "== bench voice-step"
timeout 150 python3 -m bench voice-step --device cuda --json "$OUT/voice_step.json" 2>&1 | tail -14
echo "== bench lora-serving"
timeout 240 python3 -m bench lora-serving --device cuda --requests 160 --rates 4,16 --max-tokens 32 --max-running 64 --json "$OUT/lora_serving.json" 2>&1 | grep -v Warn | tail -8
