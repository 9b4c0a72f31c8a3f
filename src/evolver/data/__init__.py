"""Data sources (digits, image folders, CSV lists), transforms and K-fold loaders."""

from evolver.data.sources import ImageSet, load_image_set, load_prediction_images

__all__ = ["ImageSet", "load_image_set", "load_prediction_images"]
