"""Property-based API testing with schemathesis: no request the OpenAPI spec allows yields a 5xx.

Three apps with real tiny engines cover every route: a diffusion LM (text routes), PixArt
(images) and Wan (videos). Server limits keep each generated request small enough that a
few hundred of them run in well under a minute on two cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from slimserve.server.app import ServerConfig, create_app
from slimserve.server.engines.diffusers_engine import load_diffusers_engine
from slimserve.server.engines.diffusion_lm import load_diffusion_lm_engine
from slimserve.server.engines.tiny_models import build_tiny_diffusion_lm, build_tiny_pixart_sigma, build_tiny_wan
from slimserve.server.live import app_in_thread

LIMITS = ServerConfig(api_key="k", max_waiting=64, default_max_tokens=4, max_tokens=16, max_side=32, max_steps=4,
                      max_frames=5)
BUILDERS = {
    "diffusion-lm": (build_tiny_diffusion_lm, load_diffusion_lm_engine),
    "pixart": (build_tiny_pixart_sigma, load_diffusers_engine),
    "wan": (build_tiny_wan, load_diffusers_engine),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_no_server_errors(kind: str, tmp_path: Path) -> None:
    """Every operation of the app's spec, 25 generated requests each (valid and invalid ones)."""
    build, load = BUILDERS[kind]
    with app_in_thread(create_app(load(build(tmp_path / "model"), "tiny"), LIMITS)) as base_url:
        schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 4
        for operation in operations:
            # schemathesis' pytest plugin does not support pytest 9 yet, so hypothesis drives it directly.
            @given(case=operation.as_strategy())
            @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def call(case: schemathesis.Case) -> None:
                case.call_and_validate(headers={"Authorization": "Bearer k"},
                                       checks=[not_a_server_error, status_code_conformance, content_type_conformance])

            call()
