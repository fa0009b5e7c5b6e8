"""Dataset readers, per-client datalists and synthetic fixtures.

Readers (real published layouts):
    :func:`read_acdc` (ACDC), :func:`read_mnms` (M&Ms-1, extracts ED/ES 3D volumes),
    :func:`read_isic` (FLamby Fed-ISIC2019).
Datalists (one JSON per federated client, see :mod:`.datalists` for the contract):
    :func:`split_cmr` (one client per vendor, ACDC -> Siemens), :func:`split_isic` (one per centre).
Synthetic data in the same layouts (deterministic given the seed):
    :func:`generate_cmr`, :func:`generate_isic`.
"""

from .acdc import read_acdc
from .datalists import cmr_datalists, isic_datalists, split_cmr, split_isic
from .isic import read_isic
from .mnms import find_mnms_csv, read_mnms
from .records import ACDC_GROUPS, ISIC_CLASSES, VENDORS, CMRRecord, DatasetFormatError, ISICRecord
from .synthetic_cmr import generate_cmr
from .synthetic_isic import generate_isic

__all__ = [
    "ACDC_GROUPS",
    "CMRRecord",
    "DatasetFormatError",
    "ISICRecord",
    "ISIC_CLASSES",
    "VENDORS",
    "cmr_datalists",
    "find_mnms_csv",
    "generate_cmr",
    "generate_isic",
    "isic_datalists",
    "read_acdc",
    "read_isic",
    "read_mnms",
    "split_cmr",
    "split_isic",
]
