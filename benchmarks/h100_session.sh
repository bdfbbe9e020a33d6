#!/usr/bin/env bash
# What one device-tool session runs on the H100, stage by stage (one call of the tool has 10 min):
#   tests     the GPU tests (exp copies, kernel contract, launch plans, entry points) ~8 min
#   compare   exp modes and launch choices, interleaved rounds (compare_exp.json)  ~1 min
#   contract  the op's contract over 5 regimes of exp(delta A), both exp modes      ~2 min
#   table     eager, torch.compile (L=512), fxopt, floor; end-to-end HF Mamba       ~7 min
#   e2e       the end-to-end rows again (host-bound: the run-to-run spread matters) ~3 min
#   host      host time per call of the ops: op vs graph entry point vs mamba_ssm   ~1 min
# usage: benchmarks/h100_session.sh STAGE [STAGE ...]; results go to $OUT (the device tool's
# output folder) or ./out.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-out}
mkdir -p "$out"
day=$(date +%F)
for stage in "$@"; do
  case $stage in
    tests)
      python -m pytest -q -p no:cacheprovider tests/test_exp2.py tests/test_scan_kernel.py 2>&1 | tail -15 \
        | tee "$out/gpu_tests_$day.txt" ;;
    compare)
      python benchmarks/scan.py --compare benchmarks/compare_exp.json --rounds 5 --json "$out/scan_compare_$day.json" \
        2>&1 | grep -v '^{' | tail -14 ;;
    contract)
      python benchmarks/scan.py --contract --skip-kernels --skip-e2e --contract-dists test mamba-init slow still fast \
        --contract-cfg '{"exp": "fma"}' 2>&1 | grep -v "^ *$" | tail -12 | tee "$out/scan_contract_$day.txt" ;;
    table)
      python benchmarks/scan.py --dtypes-all --json "$out/scan_table_$day.json" 2>&1 | grep -v '^{' | tail -30 ;;
    e2e)
      python benchmarks/scan.py --skip-kernels --json "$out/scan_e2e_rerun_$day.json" 2>&1 | grep -v '^{' | tail -8 ;;
    host)
      python benchmarks/host_cost.py --json "$out/host_cost_$day.json" 2>&1 | grep -v '^{' | tail -32 ;;
    *)
      echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
