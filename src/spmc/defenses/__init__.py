"""Server-side defenses: one module per method, one registry line each (DESIGN.md "Registries")."""

from __future__ import annotations

from spmc.defenses.base import Aggregate, Defense, RoundInputs, Stateful, weighted_average
from spmc.defenses.bucketing import Bucketing, BucketingOptions
from spmc.defenses.bulyan import Bulyan, BulyanOptions
from spmc.defenses.centered_clip import CenteredClip, CenteredClipOptions
from spmc.defenses.crfl import CRFL, CRFLOptions
from spmc.defenses.dnc import DnC, DnCOptions
from spmc.defenses.fedavg import FedAvg, FedAvgOptions, fedavg_weights
from spmc.defenses.fedcpa import FedCPA, FedCPAOptions
from spmc.defenses.finetuning import Finetuning, FinetuningOptions
from spmc.defenses.fltrust import FLTrust, FLTrustOptions
from spmc.defenses.foolsgold import FoolsGold, FoolsGoldOptions
from spmc.defenses.krum import Krum, KrumOptions
from spmc.defenses.median import Median, MedianOptions
from spmc.defenses.multikrum import MultiKrum, MultiKrumOptions
from spmc.defenses.norm_clip import NormClip, NormClipOptions
from spmc.defenses.rfa import RFA, RFAOptions
from spmc.defenses.rlr import RLR, RLROptions
from spmc.defenses.rsa import RSA, RSAOptions
from spmc.defenses.sageflow import Sageflow, SageflowOptions
from spmc.defenses.signguard import SignGuard, SignGuardOptions
from spmc.defenses.spmc import (
    SPMC,
    SPMCOptions,
    loo_cosine_scores,
    marginal_teachers,
    reference_cosine_scores,
    spmc_weights,
)
from spmc.defenses.trimmed_mean import TrimmedMean, TrimmedMeanOptions
from spmc.defenses.weak_dp import WeakDP, WeakDPOptions
from spmc.plugins import DEFENSE, load_entry_points
from spmc.threat import ThreatModel

DEFENSES: dict[str, type[Defense]] = {
    "fedavg": FedAvg,
    "spmc": SPMC,
    "dnc": DnC,
    "sageflow": Sageflow,
    "bulyan": Bulyan,
    "rfa": RFA,
    "rlr": RLR,
    "crfl": CRFL,
    "foolsgold": FoolsGold,
    "rsa": RSA,
    "finetuning": Finetuning,
    "krum": Krum,
    "multikrum": MultiKrum,
    "trimmed_mean": TrimmedMean,
    "median": Median,
    "fltrust": FLTrust,
    "fedcpa": FedCPA,
    "norm_clip": NormClip,
    "weak_dp": WeakDP,
    "centered_clip": CenteredClip,
    "bucketing": Bucketing,
    "signguard": SignGuard,
}
load_entry_points("spmc.defenses", DEFENSES, DEFENSE)


__all__ = [
    "CRFL",
    "DEFENSES",
    "RFA",
    "RLR",
    "RSA",
    "SPMC",
    "Aggregate",
    "Bucketing",
    "BucketingOptions",
    "Bulyan",
    "BulyanOptions",
    "CRFLOptions",
    "CenteredClip",
    "CenteredClipOptions",
    "Defense",
    "DnC",
    "DnCOptions",
    "FLTrust",
    "FLTrustOptions",
    "FedAvg",
    "FedAvgOptions",
    "FedCPA",
    "FedCPAOptions",
    "Finetuning",
    "FinetuningOptions",
    "FoolsGold",
    "FoolsGoldOptions",
    "Krum",
    "KrumOptions",
    "Median",
    "MedianOptions",
    "MultiKrum",
    "MultiKrumOptions",
    "NormClip",
    "NormClipOptions",
    "RFAOptions",
    "RLROptions",
    "RSAOptions",
    "RoundInputs",
    "SPMCOptions",
    "Sageflow",
    "SageflowOptions",
    "SignGuard",
    "SignGuardOptions",
    "Stateful",
    "ThreatModel",
    "TrimmedMean",
    "TrimmedMeanOptions",
    "WeakDP",
    "WeakDPOptions",
    "fedavg_weights",
    "loo_cosine_scores",
    "marginal_teachers",
    "reference_cosine_scores",
    "spmc_weights",
    "weighted_average",
]
