"""One reader per distribution format. Each is `read(info, data_dir, options) -> (info, official_train, test)`
with uint8 ImageSets; the registry (../registry.py) names which reader serves which dataset."""
