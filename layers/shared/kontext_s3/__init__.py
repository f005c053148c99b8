"""kontext-s3: S3 uploads in, FLUX.1 Kontext [max] edits out, through fal's queue."""
