"""Model code: the fusion head (torch), gradient-boosted trees and the ensemble.

Kept free of imports on purpose: importing one model module (e.g. the GBDT one) must not pull in
torch or the boosters of the others.
"""
