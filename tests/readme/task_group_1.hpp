// SPDX-License-Identifier: BSL-1.0
// README.md, task_group: a profile from three backends, thumbnails under a
// limit.
#pragma once

#include <vector>

struct user_record {};
struct order {};
struct picture {};
struct profile {
  user_record user;
  std::vector<order> orders;
  picture avatar;
};
inline user_record fetch_user(int, const weft::cancel_token&) { return {}; }
inline std::vector<order> fetch_orders(int, const weft::cancel_token&) { return {}; }
inline picture load_avatar(int) { return {}; }

struct image {};
struct thumbnail {};
inline thumbnail make_thumbnail(const image&) { return {}; }
