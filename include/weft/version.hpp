// SPDX-License-Identifier: BSL-1.0
// weft's version, as macros a build can test and a program can print.
#pragma once

#define WEFT_VERSION_MAJOR 0
#define WEFT_VERSION_MINOR 1
#define WEFT_VERSION_PATCH 0

// One number for comparisons: major * 10000 + minor * 100 + patch.
#define WEFT_VERSION (WEFT_VERSION_MAJOR * 10000 + WEFT_VERSION_MINOR * 100 + WEFT_VERSION_PATCH)
