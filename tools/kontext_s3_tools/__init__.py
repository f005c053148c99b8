"""Tools around kontext-s3 that are not deployed: the CLI, the fal emulator, the local stack."""
