"""Learning dynamics from what a governed run recorded (specs/dynamics.md).

``scan(ledger)`` scores every training example's memorization from its recorded loss trace (its mean, or LT-IQR)
and flags the top fraction; ``Governance(..., memorization=MemorizationScan(...))`` records that scan
at each checkpoint of the run as a signed ``MemorizationScan``, which the verifier recomputes.
``Governance(..., profiles=DepthProfiles("heldout"))`` records at each checkpoint how sure the model is
of each class at each band's boundary (a signed ``DepthProfile``), which replay recomputes.
"""

from .profiles import DepthProfiles
from .memorization import (LT_IQR, MEAN_LOSS, METHOD, METHODS, LossTraces, MemorizationScan, flag, lt_iqr, mean_loss,
                           scores_digest)
from .record import SCAN_FORMAT, record_scan, scan_body
from .scan import ScanError, scan

__all__ = ["LT_IQR", "MEAN_LOSS", "METHOD", "METHODS", "DepthProfiles", "SCAN_FORMAT", "LossTraces", "MemorizationScan",
           "ScanError", "flag", "lt_iqr", "mean_loss", "record_scan", "scan", "scan_body", "scores_digest"]
