"""The Zarr campaign store and its read API (see ``campaign.py`` for the tables)."""

from matdisc.store.campaign import Campaign, CampaignWriter, open_campaign, record_columns
from matdisc.store.frames import Frames
from matdisc.store.tables import Batch, TableStore

__all__ = ["Batch", "Campaign", "CampaignWriter", "Frames", "TableStore", "open_campaign", "record_columns"]
