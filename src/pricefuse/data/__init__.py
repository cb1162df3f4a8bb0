"""Raw product data: catalog parsing, units, group folds, images and the synthetic demo set.

Submodules are imported explicitly (`from pricefuse.data import catalog`) so that importing one
of them never drags in the heavier ones (PIL for images, HTTP clients for fetching).
"""
