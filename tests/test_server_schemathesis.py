"""Property-based API testing with schemathesis: no request the OpenAPI spec allows yields a 5xx.

Three apps with real tiny engines cover every route: a diffusion LM (text routes), PixArt
(images) and Wan (videos, including the multipart ``POST /v1/videos`` and ``/v1/videos/sync``).
Server limits keep each generated request small enough that a
few hundred of them run in well under a minute on two cores.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from slimserve.server.app import ServerConfig, create_app
from slimserve.server.engines.diffusers_engine import load_diffusers_engine
from slimserve.server.engines.diffusion_lm import load_diffusion_lm_engine
from slimserve.testing.live import app_in_thread

LIMITS = ServerConfig(api_key="k", max_waiting=64, default_max_tokens=4, max_tokens=16, max_side=32, max_steps=4,
                      max_frames=5)
# kind -> (the conftest fixture holding its tiny model folder, the engine loader)
BUILDERS = {
    "diffusion-lm": ("tiny_diffusion_lm", load_diffusion_lm_engine),
    "pixart": ("tiny_pixart", load_diffusers_engine),
    "wan": ("tiny_wan", load_diffusers_engine),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_no_server_errors(kind: str, request: pytest.FixtureRequest) -> None:
    """Every operation of the app's spec, 25 generated requests each (valid and invalid ones)."""
    fixture, load = BUILDERS[kind]
    with app_in_thread(create_app(load(request.getfixturevalue(fixture), "tiny"), LIMITS)) as base_url:
        schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 4
        if kind == "wan":  # the multipart routes are generated and sent as form data too
            posted = {operation.path for operation in operations if operation.method.upper() == "POST"}
            assert {"/v1/videos", "/v1/videos/sync"} <= posted, posted
        for operation in operations:
            # schemathesis' pytest plugin does not support pytest 9 yet, so hypothesis drives it directly.
            @given(case=operation.as_strategy())
            @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def call(case: schemathesis.Case) -> None:
                case.call_and_validate(headers={"Authorization": "Bearer k"},
                                       checks=[not_a_server_error, status_code_conformance, content_type_conformance])

            call()
