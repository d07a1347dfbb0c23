"""Datamodules, one file per dataset family; `base.py` holds the contract and the file guard."""

from fusionbench.data.avmnist import AVMNISTDataModule
from fusionbench.data.base import FusionDataModule, TensorDictDataset
from fusionbench.data.generative import GenerativeDataModule
from fusionbench.data.lattice import LatticeDataModule
from fusionbench.data.mag import MAGDataModule
from fusionbench.data.mmimdb import MMIMDBDataModule
from fusionbench.data.mmimdb_raw import MMIMDBRawDataModule
from fusionbench.data.mogonet import MogonetDataModule
from fusionbench.data.mosei import MOSEIDataModule
from fusionbench.data.mosi_cmbert import CMBERTMOSIDataModule
from fusionbench.data.nyuv2 import NYUv2DataModule
from fusionbench.data.rgbd_synthetic import RGBDSyntheticDataModule
from fusionbench.data.stocks import StocksDataModule
from fusionbench.data.synthetic import SyntheticDataModule
from fusionbench.data.vqa import VQADataModule

__all__ = [
    "AVMNISTDataModule",
    "CMBERTMOSIDataModule",
    "FusionDataModule",
    "GenerativeDataModule",
    "LatticeDataModule",
    "MAGDataModule",
    "MMIMDBDataModule",
    "MMIMDBRawDataModule",
    "MOSEIDataModule",
    "MogonetDataModule",
    "NYUv2DataModule",
    "RGBDSyntheticDataModule",
    "StocksDataModule",
    "SyntheticDataModule",
    "TensorDictDataset",
    "VQADataModule",
]
