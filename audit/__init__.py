"""cam-audit: does an image classifier look at the object, or at a shortcut?"""

__version__ = "0.1.0"
