"""Named measurement protocols: how FVD preprocesses frames, how IS draws its subsets, how real clips match the
generated frame rate. Each is one config value, recorded with its concrete settings in results.json."""
