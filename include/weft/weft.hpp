// SPDX-License-Identifier: BSL-1.0
// weft: Go's concurrency patterns for C++ services. This umbrella header
// includes every public header except the Boost.Asio layer (weft/asio.hpp)
// and the test helpers (weft/testing/).
#pragma once

#include <weft/cancel.hpp>
#include <weft/channel.hpp>
#include <weft/config.hpp>
#include <weft/fan.hpp>
#include <weft/manual_clock.hpp>
#include <weft/object_pool.hpp>
#include <weft/pipeline.hpp>
#include <weft/registry.hpp>
#include <weft/resource_pool.hpp>
#include <weft/select.hpp>
#include <weft/semaphore.hpp>
#include <weft/spawn_site.hpp>
#include <weft/task_group.hpp>
#include <weft/version.hpp>
#include <weft/wait_group.hpp>
#include <weft/wait_status.hpp>
#include <weft/worker_pool.hpp>
