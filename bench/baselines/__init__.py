"""Fair pure-Python baselines that stages compare against."""
