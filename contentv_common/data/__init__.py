"""The video data path shared by both backends: manifest -> decode -> bucket -> latent/text cache -> batches."""
