"""The training wing: the one stage runner that train, qat and qat_pt2e call, the loop it runs, and
the device and precision the loop runs on."""
