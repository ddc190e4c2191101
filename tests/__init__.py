"""kmlbus test suites: host tests here, VM tests in vm/, test doubles in support/."""
