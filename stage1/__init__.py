"""stage1: run an image from a fetchd store, unprivileged. Imports nothing from fetchd."""
