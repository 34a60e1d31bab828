#!/usr/bin/env bash
# Fashion-MNIST, the embedded default data set: Debian's package when we may install it,
# otherwise the official download (checksummed) into ./data/FashionMNIST.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d /usr/share/datasets/fashion-mnist ] || [ -d data/FashionMNIST ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get install -y -qq dataset-fashion-mnist || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }) >/dev/null
else
  .venv/bin/python -c "from data.datasets import load_dataset; load_dataset('FashionMNIST_x28', './data/', download=True)"
fi
