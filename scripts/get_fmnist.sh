#!/usr/bin/env bash
# Put the Fashion-MNIST IDX files in $1 (default data/fashion-mnist), from Debian's dataset-fashion-mnist.
# No dataset is downloaded from the web: the files come from the Debian package registry.
set -euo pipefail
dest=${1:-data/fashion-mnist}
files="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
have_all() { for f in $files; do [ -s "$1/$f" ] || return 1; done; }
have_all "$dest" && exit 0
system=/usr/share/datasets/fashion-mnist
if ! have_all "$system"; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing Debian package dataset-fashion-mnist" >&2
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  fi
fi
mkdir -p "$dest"
if have_all "$system"; then
  for f in $files; do cp "$system/$f" "$dest/$f.part" && mv "$dest/$f.part" "$dest/$f"; done
  exit 0
fi
# Without root: fetch the .deb and unpack it locally.
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download dataset-fashion-mnist >/dev/null)
dpkg-deb -x "$work"/dataset-fashion-mnist_*.deb "$work/root"
for f in $files; do cp "$work/root$system/$f" "$dest/$f.part" && mv "$dest/$f.part" "$dest/$f"; done
have_all "$dest" || { echo "Fashion-MNIST not found after install: expected $files in $dest" >&2; exit 1; }
