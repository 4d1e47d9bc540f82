"""The repository's Cu-Pd EMT example (examples/cu-pd-emt.yaml) run in-process to its last round
(no early stop), then each round's screening-model MAE on its new DFT structures and the model
guard's decisions. Run: ``.venv/bin/python benchmarks/example_campaign.py STORE [key=value ...]``."""
import json, sys, warnings
warnings.filterwarnings("ignore")
import yaml
from matdisc.config import CampaignConfig
from matdisc.executor import InProcess
from matdisc.round import run_campaign
from matdisc.store import open_campaign


def main():
    store = sys.argv[1]
    data = yaml.safe_load(open("examples/cu-pd-emt.yaml"))
    data["store"] = store
    data["mlip"]["device"] = "cpu"
    data["active_learning"]["patience"] = None
    data["active_learning"]["max_dft_total"] = None
    for kv in sys.argv[2:]:
        k, v = kv.split("=", 1)
        d = data
        *path, last = k.split(".")
        for p in path:
            d = d.setdefault(p, {})
        d[last] = yaml.safe_load(v)
    run_campaign(CampaignConfig.model_validate(data), InProcess())
    r = open_campaign(store).rounds()
    cols = [c for c in ("round", "mae_before_mev", "mae_after_mev", "heldout_mae_previous_mev", "heldout_mae_new_mev", "model_decision", "n_train_frames") if c in r]
    print(r[cols].to_string())


if __name__ == "__main__":  # training processes re-import this module
    main()
