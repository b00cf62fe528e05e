"""The model layer: config, checkpoint, adapters, preprocessing, reference encoder, tiny checkpoint."""
