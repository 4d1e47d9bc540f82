"""The Zarr campaign store and its read API (see ``campaign.py`` for the tables)."""

from matdisc.store.campaign import Campaign, CampaignWriter, open_campaign
from matdisc.store.frames import Frames
from matdisc.store.tables import TableStore

__all__ = ["Campaign", "CampaignWriter", "Frames", "TableStore", "open_campaign"]
